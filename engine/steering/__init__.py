"""Steering: residual-stream edits, generation under them, plans, and faithfulness evaluation."""
