//! A small blocking client of the Kubernetes CRI (v1) for the containerd CRI tests and benchmarks:
//! what kubelet would say to containerd's CRI plugin, over its unix socket, with the published
//! `k8s-cri` bindings (kubelet and crictl are not available here).

use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// How long one CRI call may take (a pod start boots a VM under TCG on a loaded machine).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// A pod sandbox as created: its id and the config that CreateContainer repeats.
#[derive(Clone, Debug)]
pub struct Pod {
    /// The sandbox id containerd gave it.
    pub id: String,
    /// The config it was created with.
    pub config: cri::PodSandboxConfig,
}

/// A connected CRI runtime-service client.
pub struct Cri {
    rt: tokio::runtime::Runtime,
    client: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

/// A CRI call that failed: the gRPC status message.
#[derive(Debug)]
pub struct CriError(pub String);

impl std::fmt::Display for CriError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CriError {}

fn status(e: tonic::Status) -> CriError {
    CriError(format!("{:?}: {}", e.code(), e.message()))
}

impl Cri {
    /// Connects to the CRI socket `socket`.
    pub fn connect(socket: &Path) -> Result<Self, CriError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| CriError(format!("tokio runtime: {e}")))?;
        let path: PathBuf = socket.to_path_buf();
        let channel = rt
            .block_on(async move {
                // The URI is required by tonic but unused: the connector dials the socket.
                Endpoint::try_from("http://[::]:0")
                    .unwrap()
                    .timeout(CALL_TIMEOUT)
                    .connect_with_connector(tower::service_fn(move |_| {
                        let path = path.clone();
                        async move {
                            let s = tokio::net::UnixStream::connect(path).await?;
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                        }
                    }))
                    .await
            })
            .map_err(|e| CriError(format!("connecting to {}: {e}", socket.display())))?;
        Ok(Cri {
            rt,
            client: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }

    /// The runtime's name and version (`Version`).
    pub fn version(&mut self) -> Result<String, CriError> {
        let r = self
            .rt
            .block_on(self.client.version(cri::VersionRequest {
                version: "v1".into(),
            }))
            .map_err(status)?
            .into_inner();
        Ok(format!("{} {}", r.runtime_name, r.runtime_version))
    }

    /// Whether the CRI plugin knows image `image` (`ImageStatus`): it learns of images imported
    /// with ctr from containerd's events, a moment after the import.
    pub fn has_image(&mut self, image: &str) -> Result<bool, CriError> {
        let r = self
            .rt
            .block_on(self.images.image_status(cri::ImageStatusRequest {
                image: Some(cri::ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                verbose: false,
            }))
            .map_err(status)?
            .into_inner();
        Ok(r.image.is_some())
    }

    /// `RunPodSandbox` of a pod named `name` with runtime handler `handler` (empty: the
    /// default), its logs under `log_dir`.
    pub fn run_pod(&mut self, name: &str, handler: &str, log_dir: &Path) -> Result<Pod, CriError> {
        self.run_pod_with(name, handler, log_dir, false, 0, 0)
    }

    /// [`Cri::run_pod`], with `host_network` (Kubernetes' `hostNetwork: true`: the pod shares
    /// the node's network namespace) and the pod-level memory limit and CPUs kubelet passes
    /// (`linux.resources`: `memory_limit_in_bytes`, a CFS quota of `pod_cpus` periods; 0: none).
    pub fn run_pod_with(
        &mut self,
        name: &str,
        handler: &str,
        log_dir: &Path,
        host_network: bool,
        pod_memory: i64,
        pod_cpus: i64,
    ) -> Result<Pod, CriError> {
        let network = if host_network {
            cri::NamespaceMode::Node
        } else {
            cri::NamespaceMode::Pod
        };
        let config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{name}"),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: log_dir.display().to_string(),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: String::new(),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: network as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                resources: (pod_memory > 0 || pod_cpus > 0).then(|| cri::LinuxContainerResources {
                    memory_limit_in_bytes: pod_memory,
                    cpu_period: if pod_cpus > 0 { 100_000 } else { 0 },
                    cpu_quota: pod_cpus * 100_000,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let r = self
            .rt
            .block_on(self.client.run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: handler.into(),
            }))
            .map_err(status)?
            .into_inner();
        Ok(Pod {
            id: r.pod_sandbox_id,
            config,
        })
    }

    /// `CreateContainer` named `name` in `pod` from `image` running `command`, its log at
    /// `<pod log dir>/<name>.log`; returns the container id.
    pub fn create_container(
        &mut self,
        pod: &Pod,
        name: &str,
        image: &str,
        command: &[&str],
    ) -> Result<String, CriError> {
        self.create_container_with(pod, name, image, command, 0)
    }

    /// [`Cri::create_container`] with a memory limit (`memory_limit_in_bytes`; 0: none).
    pub fn create_container_with(
        &mut self,
        pod: &Pod,
        name: &str,
        image: &str,
        command: &[&str],
        memory_limit: i64,
    ) -> Result<String, CriError> {
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: image.into(),
                annotations: HashMap::new(),
                ..Default::default()
            }),
            command: command.iter().map(|s| s.to_string()).collect(),
            log_path: format!("{name}.log"),
            linux: Some(cri::LinuxContainerConfig {
                resources: Some(cri::LinuxContainerResources {
                    memory_limit_in_bytes: memory_limit,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let r = self
            .rt
            .block_on(self.client.create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.id.clone(),
                config: Some(config),
                sandbox_config: Some(pod.config.clone()),
            }))
            .map_err(status)?
            .into_inner();
        Ok(r.container_id)
    }

    /// `StartContainer`.
    pub fn start_container(&mut self, id: &str) -> Result<(), CriError> {
        self.rt
            .block_on(self.client.start_container(cri::StartContainerRequest {
                container_id: id.into(),
            }))
            .map_err(status)?;
        Ok(())
    }

    /// The container's state (`ContainerStatus`): e.g. `ContainerRunning`, `ContainerExited`.
    pub fn container_state(&mut self, id: &str) -> Result<String, CriError> {
        let r = self
            .rt
            .block_on(self.client.container_status(cri::ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            }))
            .map_err(status)?
            .into_inner();
        let s = r.status.map(|s| s.state).unwrap_or_default();
        Ok(cri::ContainerState::try_from(s)
            .map(|s| format!("{s:?}"))
            .unwrap_or_else(|_| s.to_string()))
    }

    /// `ExecSync`: (exit code, stdout, stderr).
    pub fn exec_sync(
        &mut self,
        id: &str,
        cmd: &[&str],
        timeout_s: i64,
    ) -> Result<(i32, String, String), CriError> {
        let r = self
            .rt
            .block_on(self.client.exec_sync(cri::ExecSyncRequest {
                container_id: id.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: timeout_s,
            }))
            .map_err(status)?
            .into_inner();
        Ok((
            r.exit_code,
            String::from_utf8_lossy(&r.stdout).into_owned(),
            String::from_utf8_lossy(&r.stderr).into_owned(),
        ))
    }

    /// `UpdateContainerResources` with a new memory limit (what kubelet sends when a pod is
    /// resized).
    pub fn update_memory(&mut self, id: &str, memory_limit: i64) -> Result<(), CriError> {
        self.rt
            .block_on(self.client.update_container_resources(
                cri::UpdateContainerResourcesRequest {
                    container_id: id.into(),
                    linux: Some(cri::LinuxContainerResources {
                        memory_limit_in_bytes: memory_limit,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ))
            .map_err(status)?;
        Ok(())
    }

    /// `ContainerStats` (what kubelet reads for `kubectl top`): (memory working set bytes,
    /// CPU time in nanoseconds).
    pub fn container_stats(&mut self, id: &str) -> Result<(u64, u64), CriError> {
        let r = self
            .rt
            .block_on(self.client.container_stats(cri::ContainerStatsRequest {
                container_id: id.into(),
            }))
            .map_err(status)?
            .into_inner();
        let s = r.stats.unwrap_or_default();
        let mem = s
            .memory
            .and_then(|m| m.working_set_bytes)
            .map_or(0, |v| v.value);
        let cpu = s
            .cpu
            .and_then(|c| c.usage_core_nano_seconds)
            .map_or(0, |v| v.value);
        Ok((mem, cpu))
    }

    /// `StopPodSandbox`.
    pub fn stop_pod(&mut self, id: &str) -> Result<(), CriError> {
        self.rt
            .block_on(self.client.stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: id.into(),
            }))
            .map_err(status)?;
        Ok(())
    }

    /// `RemovePodSandbox`.
    pub fn remove_pod(&mut self, id: &str) -> Result<(), CriError> {
        self.rt
            .block_on(
                self.client
                    .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                        pod_sandbox_id: id.into(),
                    }),
            )
            .map_err(status)?;
        Ok(())
    }

    /// The pod's network namespace path, from the verbose `PodSandboxStatus` info.
    pub fn pod_netns(&mut self, id: &str) -> Result<String, CriError> {
        let r = self
            .rt
            .block_on(
                self.client
                    .pod_sandbox_status(cri::PodSandboxStatusRequest {
                        pod_sandbox_id: id.into(),
                        verbose: true,
                    }),
            )
            .map_err(status)?
            .into_inner();
        let info = r.info.get("info").cloned().unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&info).unwrap_or_default();
        Ok(v["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .and_then(|a| a.iter().find(|n| n["type"] == "network"))
            .and_then(|n| n["path"].as_str())
            .unwrap_or_default()
            .to_string())
    }
}
