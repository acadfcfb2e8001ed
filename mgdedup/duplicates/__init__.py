"""From descriptors to duplicate decisions: pairs, groups, scores, precision calibration, a
person's verdicts, reports and the safe, undoable actions on files."""
