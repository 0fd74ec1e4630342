"""Rules: one small function per check, each with a stable id (TFB1xx … TFB8xx)."""
