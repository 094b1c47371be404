"""Engram conditional memory: pure model math and addressing (no network, Redis, Ray or tracing)."""
