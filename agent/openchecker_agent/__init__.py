"""The openchecker agent: a RabbitMQ consumer that runs check requests.

`openchecker_agent.cli` runs the consumer, `openchecker_agent.publishing`
publishes check requests, and `openchecker_agent.checks` contains the built-in
handler.
"""
