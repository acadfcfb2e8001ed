"""`mgdedup review`: the duplicate groups of an index in a local page where a person decides
(keep this one, not a duplicate, a duplicate) and applies an action after its dry run."""
