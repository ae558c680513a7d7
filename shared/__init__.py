"""FedMask domain package: masked models, mask math, aggregation kernel, codec, datasets, simulator.

Nothing here imports a broker client; RabbitMQ and Redis live behind adapters elsewhere.
"""
