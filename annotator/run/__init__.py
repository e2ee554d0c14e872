"""Run: the drivers: an annotation run (passes), `--add-recipe` on a finished run, and the cost plan."""
