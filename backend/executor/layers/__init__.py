"""Model building blocks, written tensor-parallel from the start."""
