"""Score: pass 1: read input units, score safety, select documents for reflection, count the corpus."""
