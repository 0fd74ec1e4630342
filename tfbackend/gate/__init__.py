"""The onboarding gate: a manifest of models, checked (and optionally run) in one process.

manifest → runner → GateReport → (baseline diff) → console / JSON / JUnit / Markdown.
"""
