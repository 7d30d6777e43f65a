//! The VM and image operations the API calls. Each validates its input, then writes desired state;
//! the reconciler does the rest. `create_vm` also creates the VM's disk overlay before it
//! returns, so a full disk or a broken image is reported to the caller, and undone, at once.

use crate::AgentError;
use crate::host::{Host, Shared};
use crate::images::{ImportSource, qemu_format};
use novacron_qemu::RunDirectory;
use novacron_types::{
    ByteSize, CreateVmRequest, DeleteOptions, DesiredPower, ErrorCode, ImageRecord,
    RECORD_FORMAT_VERSION, StopOptions, VmName, VmRecord, VmSpec, VmState, VmStatus, unix_now,
};
use std::path::{Path, PathBuf};

const MIN_MEMORY_BYTES: u64 = 32 << 20;
const MAX_CMDLINE_BYTES: usize = 4096;

fn validate_host_file(what: &str, path: &str) -> Result<PathBuf, AgentError> {
    let path_buf = PathBuf::from(path);
    if !path_buf.is_absolute() {
        return Err(AgentError::InvalidArgument(format!(
            "{what} path {path:?} must be absolute (a file on the host running novacron serve)"
        )));
    }
    match std::fs::metadata(&path_buf) {
        Ok(metadata) if metadata.is_file() => Ok(path_buf),
        Ok(_) => Err(AgentError::InvalidArgument(format!(
            "{what} {path:?} is not a regular file"
        ))),
        Err(error) => Err(AgentError::InvalidArgument(format!(
            "{what} {path:?} cannot be read on this host: {error}"
        ))),
    }
}

impl Host {
    pub async fn list_vms(&self) -> Result<Vec<VmRecord>, AgentError> {
        Ok(self
            .shared
            .records
            .vms()
            .await?
            .into_iter()
            .map(|versioned| versioned.record)
            .collect())
    }

    pub async fn get_vm(&self, name: &str) -> Result<VmRecord, AgentError> {
        let name = VmName::new(name)?;
        self.shared
            .records
            .vm(name.as_str())
            .await?
            .map(|versioned| versioned.record)
            .ok_or_else(|| AgentError::VmNotFound {
                name: name.to_string(),
            })
    }

    pub async fn create_vm(&self, request: CreateVmRequest) -> Result<VmRecord, AgentError> {
        let shared = &self.shared;
        let name = VmName::new(request.name.clone())?;
        let capacity = shared.capacity;
        if request.cpus == 0 {
            return Err(AgentError::InvalidArgument(
                "cpus must be at least 1".into(),
            ));
        }
        if request.cpus > capacity.cpus {
            return Err(AgentError::InsufficientResources {
                what: "cpus",
                asked: request.cpus.to_string(),
                available: capacity.cpus.to_string(),
            });
        }
        if request.memory_bytes < MIN_MEMORY_BYTES || !request.memory_bytes.is_multiple_of(1 << 20)
        {
            return Err(AgentError::InvalidArgument(format!(
                "memory {} must be a whole number of MiB and at least {}",
                ByteSize(request.memory_bytes),
                ByteSize(MIN_MEMORY_BYTES)
            )));
        }
        if request.memory_bytes > capacity.memory_bytes {
            return Err(AgentError::InsufficientResources {
                what: "memory",
                asked: ByteSize(request.memory_bytes).to_string(),
                available: ByteSize(capacity.memory_bytes).to_string(),
            });
        }
        let image = match &request.image {
            Some(reference) => Some(shared.records.resolve_image(reference).await?),
            None => None,
        };
        match (&image, request.disk_bytes) {
            (None, Some(_)) => {
                return Err(AgentError::InvalidArgument(
                    "a disk size needs an image (--image) to back the disk".into(),
                ));
            }
            (Some(image), Some(disk)) if disk < image.virtual_bytes => {
                return Err(AgentError::InvalidArgument(format!(
                    "disk size {} is smaller than image {}'s {}",
                    ByteSize(disk),
                    image.name,
                    ByteSize(image.virtual_bytes)
                )));
            }
            _ => {}
        }
        let kernel = request
            .kernel
            .as_deref()
            .map(|path| validate_host_file("kernel", path))
            .transpose()?;
        let initrd = request
            .initrd
            .as_deref()
            .map(|path| validate_host_file("initrd", path))
            .transpose()?;
        if initrd.is_some() && kernel.is_none() {
            return Err(AgentError::InvalidArgument(
                "--initrd needs --kernel".into(),
            ));
        }
        if request.cmdline.is_some() && kernel.is_none() {
            return Err(AgentError::InvalidArgument(
                "--cmdline needs --kernel".into(),
            ));
        }
        if request
            .cmdline
            .as_ref()
            .is_some_and(|cmdline| cmdline.len() > MAX_CMDLINE_BYTES)
        {
            return Err(AgentError::InvalidArgument(format!(
                "kernel command line is longer than {MAX_CMDLINE_BYTES} bytes"
            )));
        }
        if image.is_none() && kernel.is_none() {
            return Err(AgentError::InvalidArgument(
                "nothing to boot: give an image (--image) or a kernel (--kernel)".into(),
            ));
        }
        if let Some(storage) = &request.storage {
            novacron_types::validate_storage_name(storage)?;
            if image.is_none() {
                return Err(AgentError::InvalidArgument(format!(
                    "--storage {storage} holds a VM's disk, and this VM has none: give an image \
                     (--image) or leave out --storage"
                )));
            }
            self.check_storage_mounted_somewhere(storage).await?;
        }
        // Refuse early, with the package name, when QEMU is missing.
        shared.hypervisor.binaries()?;
        novacron_types::validate_labels(&request.required_labels)?;
        if let Some(group) = &request.anti_affinity_group {
            novacron_types::validate_group(group)?;
        }
        let spec = VmSpec {
            name: name.clone(),
            image_id: image.as_ref().map(|image| image.id.clone()),
            cpus: request.cpus,
            memory_bytes: request.memory_bytes,
            disk_bytes: request.disk_bytes,
            kernel,
            initrd,
            cmdline: request.cmdline.clone(),
            restart_policy: request.restart_policy,
            required_labels: request.required_labels.clone(),
            anti_affinity_group: request.anti_affinity_group.clone(),
            storage: request.storage.clone(),
        };
        let (assigned_host, placement) = match &shared.region {
            Some(region) => {
                let (host, explanation) =
                    crate::region::place_vm(shared, region, &spec, request.host.as_deref()).await?;
                (host, Some(explanation))
            }
            None => {
                self.check_constraints_alone(&spec).await?;
                (self.assigned_host(request.host.as_deref()).await?, None)
            }
        };
        // In a region the assigned host's reconciler makes the disk, even when it is this host:
        // a forwarded write whose answer was lost may still be applied later, and the VM must
        // then come out of `creating` by itself. One host makes the disk in this request.
        let here = assigned_host == shared.config.host_name && shared.region.is_none();
        if here {
            ensure_free_space(shared.paths.root(), &format!("the disk of vm {name}"))?;
            if let Some(storage) = &spec.storage {
                ensure_free_space(
                    crate::storage::storage_root(shared, storage)?,
                    &format!("the disk of vm {name}"),
                )?;
            }
        }

        let now = unix_now();
        let record = VmRecord {
            format_version: RECORD_FORMAT_VERSION,
            uuid: uuid::Uuid::new_v4().to_string(),
            spec,

            desired: if request.start {
                DesiredPower::Running
            } else {
                DesiredPower::Stopped
            },
            deletion_requested: false,
            restart_generation: 0,
            stop_force: false,
            stop_timeout_secs: shared.config.default_stop_timeout.as_secs(),
            status: VmStatus {
                state: VmState::Creating,
                reason: None,
                accelerator: None,
                accelerator_reason: None,
                pid: None,
                host: assigned_host.clone(),
                since: now,
                restarts: 0,
                observed_restart_generation: 0,
            },
            created_at: now,
            disk_by_assigned_host: !here,
            placement,
            migration: None,
        };
        shared.records.create_vm(&record).await?;
        if !here {
            // The assigned host's reconciler makes the disk and moves the VM out of `creating`.
            tracing::info!(vm = %name, host = %assigned_host, "vm recorded; its host makes the disk");
            return Ok(record);
        }
        failpoint("create-after-record");
        if let Err(error) = prepare_disk(shared, &record, image.as_ref()).await {
            // Undo: no directory, no disk, no record.
            let _ = tokio::fs::remove_dir_all(shared.paths.vm_dir(&record.uuid)).await;
            crate::storage::remove_shared_disk(shared, &record).await;
            if let Ok(Some(current)) = shared.records.vm(name.as_str()).await {
                let _ = shared
                    .records
                    .delete_vm(name.as_str(), current.mod_revision)
                    .await;
            }
            return Err(error);
        }
        let record = shared
            .records
            .update_vm(name.as_str(), |record| {
                if record.status.state != VmState::Creating {
                    return Ok(false);
                }
                record.status.state = VmState::Stopped;
                record.status.since = unix_now();
                Ok(true)
            })
            .await?;
        tracing::info!(vm = %name, uuid = %record.uuid, "vm created");
        Ok(record)
    }

    /// A VM on shared storage `name` needs a host mounting it: outside a region this host, in a
    /// region any live host (placement then picks among those).
    async fn check_storage_mounted_somewhere(&self, name: &str) -> Result<(), AgentError> {
        let shared = &self.shared;
        if shared.config.shared_storages.contains_key(name) {
            return Ok(());
        }
        if shared.region.is_none() {
            return Err(AgentError::StorageNotMounted {
                storage: name.to_string(),
                host: shared.config.host_name.clone(),
            });
        }
        let mounted_elsewhere = shared
            .records
            .heartbeats()
            .await?
            .iter()
            .any(|beat| beat.shared_storages.iter().any(|storage| storage == name));
        if mounted_elsewhere {
            return Ok(());
        }
        Err(AgentError::InvalidArgument(format!(
            "no host of this region mounts shared storage {name:?}; start serve with \
             --shared-storage {name}=PATH on the hosts that mount it (`novacron cluster list` \
             shows each host's)"
        )))
    }

    /// On a host outside a region, the VM's required labels and anti-affinity group are checked
    /// against this host alone (its `serve --label`s, the VMs it holds).
    async fn check_constraints_alone(&self, spec: &VmSpec) -> Result<(), AgentError> {
        let labels = &self.shared.config.labels;
        let missing: Vec<String> = spec
            .required_labels
            .iter()
            .filter(|(key, value)| labels.get(*key) != Some(*value))
            .map(|(key, value)| format!("{key}={value}"))
            .collect();
        if !missing.is_empty() {
            return Err(AgentError::InsufficientResources {
                what: "the vm",
                asked: format!("a host labelled {}", missing.join(", ")),
                available: if labels.is_empty() {
                    "no labels (serve --label KEY=VALUE adds them)".to_string()
                } else {
                    labels
                        .iter()
                        .map(|(key, value)| format!("{key}={value}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            });
        }
        if let Some(group) = &spec.anti_affinity_group {
            let members: Vec<String> = self
                .shared
                .records
                .vms()
                .await?
                .into_iter()
                .filter(|vm| vm.record.spec.anti_affinity_group.as_ref() == Some(group))
                .map(|vm| vm.record.spec.name.to_string())
                .collect();
            if !members.is_empty() {
                return Err(AgentError::InsufficientResources {
                    what: "the vm",
                    asked: format!("a host without a vm of anti-affinity group {group}"),
                    available: format!("vm(s) {} of that group", members.join(", ")),
                });
            }
        }
        Ok(())
    }

    /// The host a new VM is assigned to on a one-host cluster: this host (the only one `--host`
    /// may name). In a region, placement decides (`region::place_vm`).
    async fn assigned_host(&self, asked: Option<&str>) -> Result<String, AgentError> {
        let local = &self.shared.config.host_name;
        let Some(asked) = asked.filter(|asked| *asked != local.as_str()) else {
            return Ok(local.clone());
        };
        let hosts = [local.clone()];
        if hosts.iter().any(|host| host == asked) {
            return Ok(asked.to_string());
        }
        Err(AgentError::InvalidArgument(format!(
            "--host {asked:?} is not a host of this cluster (hosts: {}); `novacron cluster list` \
             shows them",
            hosts.join(", ")
        )))
    }

    pub async fn start_vm(&self, name: &str) -> Result<VmRecord, AgentError> {
        self.shared.hypervisor.binaries()?;
        self.change_vm(name, |record| {
            record.desired = DesiredPower::Running;
            Ok(())
        })
        .await
    }

    pub async fn stop_vm(&self, name: &str, options: StopOptions) -> Result<VmRecord, AgentError> {
        let default_timeout = self.shared.config.default_stop_timeout.as_secs();
        self.change_vm(name, |record| {
            record.desired = DesiredPower::Stopped;
            record.stop_force = options.force;
            record.stop_timeout_secs = options.timeout_secs.unwrap_or(default_timeout);
            Ok(())
        })
        .await
    }

    pub async fn pause_vm(&self, name: &str) -> Result<VmRecord, AgentError> {
        self.change_vm(name, |record| {
            if !matches!(
                record.status.state,
                VmState::Running | VmState::Paused | VmState::Starting
            ) {
                return Err(AgentError::VmWrongState {
                    name: record.spec.name.to_string(),
                    state: record.status.state,
                    hint: "only a running VM can be paused; start it first",
                });
            }
            record.desired = DesiredPower::Paused;
            Ok(())
        })
        .await
    }

    pub async fn resume_vm(&self, name: &str) -> Result<VmRecord, AgentError> {
        self.change_vm(name, |record| {
            if record.desired != DesiredPower::Paused && record.status.state != VmState::Paused {
                return Err(AgentError::VmWrongState {
                    name: record.spec.name.to_string(),
                    state: record.status.state,
                    hint: "only a paused VM can be resumed",
                });
            }
            record.desired = DesiredPower::Running;
            Ok(())
        })
        .await
    }

    pub async fn restart_vm(&self, name: &str) -> Result<VmRecord, AgentError> {
        self.change_vm(name, |record| {
            if !record.status.state.has_process() {
                return Err(AgentError::VmWrongState {
                    name: record.spec.name.to_string(),
                    state: record.status.state,
                    hint: "a VM that is not running cannot be restarted; use `vm start`",
                });
            }
            record.restart_generation += 1;
            record.desired = DesiredPower::Running;
            Ok(())
        })
        .await
    }

    pub async fn delete_vm(
        &self,
        name: &str,
        options: DeleteOptions,
    ) -> Result<VmRecord, AgentError> {
        self.change_vm(name, |record| {
            if record.status.state.has_process() && !options.force {
                return Err(AgentError::VmWrongState {
                    name: record.spec.name.to_string(),
                    state: record.status.state,
                    hint: "stop it first (`novacron vm stop`) or delete with --force",
                });
            }
            record.deletion_requested = true;
            record.desired = DesiredPower::Stopped;
            record.stop_force = true;
            Ok(())
        })
        .await
    }

    /// Logs and the console are files and sockets on the VM's own host: refuse, naming that
    /// host, when another host is asked.
    fn ensure_on_this_host(&self, record: &VmRecord, what: &str) -> Result<(), AgentError> {
        if record.status.host == self.shared.config.host_name {
            return Ok(());
        }
        Err(AgentError::Cluster {
            code: ErrorCode::Conflict,
            message: format!(
                "vm {:?} runs on host {}; its {what} is only served there: point --server at \
                 that host's API",
                record.spec.name.as_str(),
                record.status.host
            ),
        })
    }

    /// The VM's serial console log file (it may not exist before the first boot).
    pub async fn serial_log_path(&self, name: &str) -> Result<PathBuf, AgentError> {
        let record = self.get_vm(name).await?;
        self.ensure_on_this_host(&record, "serial log")?;
        Ok(RunDirectory::new(self.shared.paths.vm_dir(&record.uuid)).console_log())
    }

    /// The VM's console socket; the VM must be running.
    pub async fn console_socket_path(&self, name: &str) -> Result<PathBuf, AgentError> {
        let record = self.get_vm(name).await?;
        self.ensure_on_this_host(&record, "console")?;
        if !matches!(record.status.state, VmState::Running | VmState::Paused) {
            return Err(AgentError::VmWrongState {
                name: record.spec.name.to_string(),
                state: record.status.state,
                hint: "the console needs a running VM; start it first",
            });
        }
        Ok(RunDirectory::new(self.shared.paths.vm_dir(&record.uuid)).console_socket())
    }

    pub async fn list_images(&self) -> Result<Vec<ImageRecord>, AgentError> {
        self.shared.records.images().await
    }

    pub async fn get_image(&self, reference: &str) -> Result<ImageRecord, AgentError> {
        self.shared.records.resolve_image(reference).await
    }

    pub async fn import_image(
        &self,
        name: &str,
        source: ImportSource,
    ) -> Result<ImageRecord, AgentError> {
        let shared = &self.shared;
        let record = crate::images::import(
            &shared.paths,
            &shared.records,
            &shared.hypervisor,
            name,
            source,
        )
        .await?;
        // Its indexes (for transfers' and migrations' deduplication) are built after the
        // answer: they take about as long again as the upload.
        crate::images::index_image_in_background(shared, record.clone());
        Ok(record)
    }

    pub async fn delete_image(&self, reference: &str) -> Result<ImageRecord, AgentError> {
        let shared = &self.shared;
        let image = shared.records.resolve_image(reference).await?;
        let users: Vec<String> = shared
            .records
            .vms()
            .await?
            .into_iter()
            .filter(|vm| vm.record.spec.image_id.as_deref() == Some(image.id.as_str()))
            .map(|vm| vm.record.spec.name.to_string())
            .collect();
        if !users.is_empty() {
            return Err(AgentError::ImageInUse {
                name: image.name.to_string(),
                users: users.join(", "),
            });
        }
        shared.records.delete_image(&image).await?;
        shared.indexing_images.wait_for(&image.id).await;
        let file = shared.paths.image_file(&image.id, image.format);
        if let Err(error) = tokio::fs::remove_file(&file).await {
            tracing::warn!(file = %file.display(), %error, "image file already gone");
        }
        let _ = tokio::fs::remove_file(shared.paths.image_pages_file(&image.id)).await;
        crate::storage::remove_shared_image_copies(shared, &image).await;
        crate::images::forget_image(&shared.chunks, &image);
        tracing::info!(image = %image.name, id = %image.id, "image deleted");
        Ok(image)
    }

    /// Applies a change to a VM's desired state; refused while the VM is being deleted.
    async fn change_vm(
        &self,
        name: &str,
        mut change: impl FnMut(&mut VmRecord) -> Result<(), AgentError>,
    ) -> Result<VmRecord, AgentError> {
        let name = VmName::new(name)?;
        self.shared
            .records
            .update_vm(name.as_str(), |record| {
                if record.deletion_requested {
                    return Err(AgentError::VmWrongState {
                        name: record.spec.name.to_string(),
                        state: VmState::Deleting,
                        hint: "it is being deleted",
                    });
                }
                if let Some(migration) = &record.migration {
                    return Err(AgentError::Migration {
                        code: ErrorCode::Conflict,
                        message: format!(
                            "vm {} is being migrated (migration {migration}); wait for it \
                             (`novacron migration show {migration}`) or cancel it \
                             (`novacron vm migrate {} --cancel`)",
                            record.spec.name, record.spec.name
                        ),
                    });
                }
                change(record)?;
                Ok(true)
            })
            .await
    }
}

/// Space the data directory must keep free for a create: the store's log and the overlay's
/// metadata need a little, and a store that hits a full disk stops accepting writes.
const MIN_FREE_BYTES: u64 = 64 << 20;

pub(crate) fn ensure_free_space(directory: &Path, what: &str) -> Result<(), AgentError> {
    let stats = rustix::fs::statvfs(directory).map_err(|error| {
        AgentError::io(
            format!("checking free space in {}", directory.display()),
            error.into(),
        )
    })?;
    let free = stats.f_bavail.saturating_mul(stats.f_frsize);
    if free < MIN_FREE_BYTES {
        return Err(AgentError::DiskFull {
            directory: directory.display().to_string(),
            what: what.to_string(),
            reason: format!(
                "{} free, {} needed; free some space or move --data-dir",
                ByteSize(free),
                ByteSize(MIN_FREE_BYTES)
            ),
        });
    }
    Ok(())
}

/// Test hook: `NOVACRON_FAILPOINT=<name>` makes the process abort at that point, as `kill -9`
/// would, so tests can check recovery from a crash at an exact step.
fn failpoint(name: &str) {
    if std::env::var("NOVACRON_FAILPOINT").is_ok_and(|value| value == name) {
        tracing::error!(failpoint = name, "failpoint reached, aborting");
        std::process::abort();
    }
}

/// Creates the VM's directory and its disk overlay. Idempotent: a leftover partial overlay (a
/// crash during an earlier attempt) is replaced.
pub(crate) async fn prepare_disk(
    shared: &Shared,
    record: &VmRecord,
    image: Option<&ImageRecord>,
) -> Result<(), AgentError> {
    let directory = shared.paths.vm_dir(&record.uuid);
    tokio::fs::create_dir_all(&directory)
        .await
        .map_err(|error| AgentError::io(format!("creating {}", directory.display()), error))?;
    let Some(image) = image else {
        return Ok(());
    };
    if let Some(shared_directory) = crate::storage::shared_vm_dir(shared, record)? {
        crate::storage::create_shared_overlay(shared, record, image, &shared_directory)
            .await
            .map_err(|error| match error {
                AgentError::QemuImg(error) => {
                    disk_error(&shared_directory, &record.spec.name, error)
                }
                error => error,
            })?;
        return Ok(());
    }
    let disk = shared.paths.vm_disk(&record.uuid);
    let _ = tokio::fs::remove_file(&disk).await;
    let backing = shared.paths.image_file(&image.id, image.format);
    let qemu_img = shared.hypervisor.qemu_img()?;
    qemu_img
        .create_overlay(&backing, qemu_format(image), &disk, record.spec.disk_bytes)
        .await
        .map_err(|error| disk_error(&directory, &record.spec.name, error))?;
    Ok(())
}

fn disk_error(directory: &Path, name: &VmName, error: novacron_qemu::ImageError) -> AgentError {
    let message = error.to_string();
    if message.contains("No space left on device") {
        return AgentError::DiskFull {
            directory: directory.display().to_string(),
            what: format!("the disk of vm {name}"),
            reason: message,
        };
    }
    AgentError::QemuImg(error)
}
