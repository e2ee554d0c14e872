"""Tests of annotator/sft/."""
