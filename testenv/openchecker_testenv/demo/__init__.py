"""`make demo`: the whole flow of openchecker-operator on one machine.

The demo starts (or reuses) the local control plane and broker and
installs the CRD and the RBAC rules from manifests/. It runs the operator
as a local process with its ServiceAccount's token and publishes a batch
of check requests. No container runtime runs pods here, so local agent
processes follow the agent Deployment's `spec.replicas`. The demo ends
with a summary, a plot, and exit code 1 when a message was lost or a step
failed.
"""
