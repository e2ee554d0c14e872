"""Tests of annotator/core/."""
