"""Tests of annotator/config/."""
