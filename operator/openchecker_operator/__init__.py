"""openchecker_operator."""
