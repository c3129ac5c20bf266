"""Analysis tools: how much of a model's computation does an input need? (see docs/analysis.md)"""
