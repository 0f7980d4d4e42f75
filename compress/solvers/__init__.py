"""Pure tensor math: no module walking, no hooks, no device moves."""
