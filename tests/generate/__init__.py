"""Tests of annotator/generate/."""
