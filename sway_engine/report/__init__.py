"""Renderers of a SuiteResult: terminal, JSON, Markdown, JUnit."""
