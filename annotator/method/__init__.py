"""Method: the method as data: prompt packs (constitution, prompts, styles) and the recipes that place their outputs."""
