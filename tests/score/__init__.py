"""Tests of annotator/score/."""
