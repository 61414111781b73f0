"""Files: geometry, volume and model files, a detection's outputs written as a set, overview pictures."""
