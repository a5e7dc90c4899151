"""openchecker_agent."""
