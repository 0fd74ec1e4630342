"""Renderers: console, JSON, JUnit and Markdown views of the results; they never compute."""
