"""Tests of annotator/engine/."""
