"""Clients of the RabbitMQ broker: AMQP for declares, HTTP for everything read."""
