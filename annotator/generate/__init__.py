"""Generate: pass 2a: prompts from packs at pause points, the Generator that calls the engine, reply parsing."""
