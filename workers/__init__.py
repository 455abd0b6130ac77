"""tierpool workers: stream consumers, claimer, leader loop, entry points."""
