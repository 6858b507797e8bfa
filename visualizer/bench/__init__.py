"""Measurements: the engine against plain diffusers, the app in Chromium, model families, Ray Serve, the load test."""
