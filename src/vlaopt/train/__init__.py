"""Behaviour cloning of a VLA on demonstrations: trainer, schedules."""
