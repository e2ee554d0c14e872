"""Engine: the generator engine: model resolution, the vLLM engine lifecycle, and the replica stage that drives it."""
