"""openchecker_testenv."""
