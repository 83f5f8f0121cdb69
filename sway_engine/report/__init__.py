"""Renderers of a SuiteResult: terminal, JSON, Markdown, JUnit (text.py) and HTML (html.py)."""
