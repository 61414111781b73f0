"""Training on healthy cases: settings, cases, slices, the loop with checkpoints, calibration, several processes."""
