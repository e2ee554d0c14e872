"""Sft: persona-binding SFT data: prompt draws, conversations, the replica task, export."""
