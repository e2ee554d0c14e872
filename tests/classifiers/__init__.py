"""Tests of the classifier training scripts under classifiers/."""
