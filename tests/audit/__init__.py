"""Tests of annotator/audit/."""
