"""Helpers probes share (answers, divergences, document inputs, guard rails, persistence,
embeddings). A probe imports from here, never from a sibling probe."""
