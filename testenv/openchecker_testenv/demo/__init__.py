"""`make demo`: the whole flow of openchecker-operator on one machine.

The demo starts (or reuses) the local control plane and broker, installs
the CRD and the RBAC rules from manifests/, runs the operator as a local
process with its ServiceAccount's token, publishes a batch of check
requests, and runs local agent processes that follow the agent
Deployment's `spec.replicas`, since no container runtime runs pods here.
It ends with a summary, a plot, and exit code 1 when a message was lost or
a step failed.
"""
