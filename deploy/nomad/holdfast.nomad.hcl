# holdfast on every client node: a `system` job, in the node's network namespace
# (network_mode = "host"), with the capabilities and mounts of the Kubernetes DaemonSet
# (deploy/README.md says why each is there). The docker driver must allow the added
# capabilities: plugin "docker" { config { allow_caps = [..., "bpf", "net_admin"] } }.
job "holdfast" {
  type = "system"

  # Nomad never replaces a running holdfast on its own: a replacement closes the sockets
  # it owns. Roll a new version node by node, traffic moved away first (deploy/README.md).
  update {
    max_parallel = 1
    auto_revert  = true
  }

  group "holdfast" {
    restart {
      attempts = 10
      interval = "5m"
      delay    = "2s"
      mode     = "delay"
    }

    task "holdfast" {
      driver = "docker"

      config {
        image        = "registry.example.com/holdfast:0.1.0"
        network_mode = "host"
        args = [
          "run",
          "--units", "/local/units",
          "--state-dir", "/run/holdfast",
          "--metrics-listen", "0.0.0.0:9464",
        ]
        cap_drop = ["all"]
        cap_add  = ["bpf", "net_admin", "net_bind_service", "setuid", "setgid", "kill", "chown", "fowner"]
        mount {
          type     = "bind"
          source   = "/sys/fs/bpf"
          target   = "/sys/fs/bpf"
          readonly = false
          bind_options {
            propagation = "rslave"
          }
        }
      }

      # The units, one template per NAME.toml (from Nomad variables here). A change is
      # applied with `holdfast reload`: only what changed moves.
      template {
        destination = "local/units/hello.toml"
        change_mode = "script"
        change_script {
          command       = "/usr/local/bin/holdfast"
          args          = ["reload", "--state-dir", "/run/holdfast"]
          timeout       = "30s"
          fail_on_error = false
        }
        data = <<-EOT
        {{ with nomadVar "nomad/jobs/holdfast" }}{{ .hello_toml }}{{ end }}
        EOT
      }

      # Checks (Consul): the daemon answers on its control socket, and serves metrics.
      service {
        name         = "holdfast"
        port         = 9464
        address_mode = "driver"
        check {
          name     = "status"
          type     = "script"
          command  = "/usr/local/bin/holdfast"
          args     = ["status", "--state-dir", "/run/holdfast"]
          interval = "10s"
          timeout  = "5s"
        }
        check {
          name         = "metrics"
          type         = "http"
          path         = "/metrics"
          address_mode = "driver"
          interval     = "10s"
          timeout      = "5s"
        }
      }

      # At least the longest stop-timeout of the units.
      kill_timeout = "60s"
      kill_signal  = "SIGTERM"

      resources {
        cpu    = 100
        memory = 64
      }
    }
  }
}
