"""Orchestration behind the make targets: wires the stages, holds no algorithm."""
