"""Backends answer scoring requests over views of one base model."""
