"""Tests of annotator/method/."""
