"""Tests of annotator/publish/."""
