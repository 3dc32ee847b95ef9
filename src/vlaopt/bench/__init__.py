"""Measurement: stage timers now; FLOPs, reports and plots as the benchmark grows."""
