"""Tests of annotator/run/."""
