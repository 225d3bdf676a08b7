# Demo confidential computing enforcement (CCE) policy.
# On ACI, `az confcom acipolicygen` generates the real one; its SHA-256 is the
# HOST_DATA in the SNP report, and the key's release policy requires it.
# The blobseal demo reports this file's SHA-256 from its simulated SNP device.
package policy

api_version := "0.10.0"
framework_version := "0.2.3"

containers := [
  {"id": "blobseal", "command": ["/usr/local/bin/blobseal", "sidecar"]},
  {"id": "app", "command": ["/bin/sh", "-c", "ls /mnt/remote/demo"]},
]

mount_device := {"allowed": true}
exec_in_container := {"allowed": false}
allow_properties_access := true
allow_dump_stacks := false
allow_runtime_logging := false
