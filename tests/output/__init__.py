"""Tests of annotator/output/."""
