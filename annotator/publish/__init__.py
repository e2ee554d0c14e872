"""Publish: Hugging Face Hub cards and staging for annotation runs and SFT runs."""
