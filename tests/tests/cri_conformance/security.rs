//! Security context: a container runs with what its security context asks for (user, groups,
//! capabilities, no_new_privs, seccomp profile), and every process exec'd into it runs with
//! exactly the same confinement as its init, as runc gives it.

use anyhow::{ensure, Context, Result};
use k8s_cri::v1::security_profile::ProfileType;
use k8s_cri::v1::{Capability, ContainerConfig, Int64Value, SecurityProfile};

use crate::support::{own_pid_namespace, security, status_fields, write_file, Case};

/// The `/proc/<pid>/status` fields that make up a process's confinement.
const CONFINEMENT: &[&str] = &[
    "Uid",
    "Gid",
    "Groups",
    "NoNewPrivs",
    "Seccomp",
    "Seccomp_filters",
    "CapInh",
    "CapPrm",
    "CapEff",
    "CapBnd",
    "CapAmb",
];

/// Capability bit numbers (linux/capability.h).
const CAP_CHOWN: u32 = 0;
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;

fn profile(kind: ProfileType, localhost_ref: &str) -> Option<SecurityProfile> {
    Some(SecurityProfile {
        profile_type: kind as i32,
        localhost_ref: localhost_ref.into(),
    })
}

/// A `sleep` container in its own PID namespace (so `/proc/1` is its init) with `seccomp`.
fn sleeper(c: &Case, name: &str, seccomp: Option<SecurityProfile>) -> ContainerConfig {
    let mut config = c.container_config(name, &["sleep", "3600"]);
    own_pid_namespace(&mut config);
    security(&mut config).seccomp = seccomp;
    config
}

/// The confinement fields of the container's init and of an exec'd process, and the two
/// processes' resource limits.
struct Confinement {
    init: Vec<String>,
    exec: Vec<String>,
    init_limits: String,
    exec_limits: String,
}

async fn confinement(c: &mut Case, id: &str) -> Result<Confinement> {
    let init = c.exec_ok(id, &["cat", "/proc/1/status"]).await?;
    let exec = c.exec_ok(id, &["cat", "/proc/self/status"]).await?;
    Ok(Confinement {
        init: status_fields(&init, CONFINEMENT),
        exec: status_fields(&exec, CONFINEMENT),
        init_limits: c.exec_ok(id, &["cat", "/proc/1/limits"]).await?,
        exec_limits: c.exec_ok(id, &["cat", "/proc/self/limits"]).await?,
    })
}

impl Confinement {
    /// Fails unless the exec'd process is confined exactly as the init.
    fn same(&self) -> Result<()> {
        ensure!(
            self.init == self.exec,
            "exec'd process differs from the container's init:\ninit {:?}\nexec {:?}",
            self.init,
            self.exec
        );
        ensure!(
            self.init_limits == self.exec_limits,
            "rlimits differ:\ninit\n{}\nexec\n{}",
            self.init_limits,
            self.exec_limits
        );
        Ok(())
    }

    /// The exec'd process's value of `key` (e.g. "Seccomp: 2" -> "2").
    fn exec_value(&self, key: &str) -> Result<String> {
        let line = CONFINEMENT
            .iter()
            .position(|k| *k == key)
            .and_then(|i| self.exec.get(i))
            .with_context(|| format!("{key} not collected"))?;
        Ok(line
            .split_whitespace()
            .skip(1)
            .collect::<Vec<_>>()
            .join(" "))
    }

    /// The exec'd process's capability set `key` (CapEff, ...) as a bit mask.
    fn exec_caps(&self, key: &str) -> Result<u64> {
        let hex = self.exec_value(key)?;
        u64::from_str_radix(&hex, 16).with_context(|| format!("{key}: {hex:?}"))
    }
}

fn has(mask: u64, cap: u32) -> bool {
    mask & (1 << cap) != 0
}

/// Root container with RuntimeDefault seccomp, NET_ADMIN added and CHOWN dropped: an exec'd
/// process has the same filter, capability sets and rlimits as the init (and no capability
/// beyond them: Pangolin lends CAP_SYS_ADMIN to load the filter and takes it back).
pub async fn exec_gets_the_containers_seccomp_filter_capabilities_and_limits(
    c: &mut Case,
) -> Result<()> {
    let (pod, pod_config) = c.pod("seccomp").await?;
    let mut config = sleeper(c, "confined", profile(ProfileType::RuntimeDefault, ""));
    security(&mut config).capabilities = Some(Capability {
        add_capabilities: vec!["NET_ADMIN".into()],
        drop_capabilities: vec!["CHOWN".into()],
        ..Default::default()
    });
    let id = c.run(&pod, &pod_config, config).await?;
    let conf = confinement(c, &id).await?;
    conf.same()?;
    ensure!(
        conf.exec_value("Seccomp")? == "2",
        "not filtered: {:?}",
        conf.exec
    );
    let (eff, prm) = (conf.exec_caps("CapEff")?, conf.exec_caps("CapPrm")?);
    ensure!(has(eff, CAP_NET_ADMIN), "NET_ADMIN not added: {eff:x}");
    ensure!(!has(eff, CAP_CHOWN), "CHOWN not dropped: {eff:x}");
    ensure!(
        !has(eff, CAP_SYS_ADMIN) && !has(prm, CAP_SYS_ADMIN),
        "exec holds CAP_SYS_ADMIN: eff {eff:x} prm {prm:x}"
    );
    let chown = c.exec(&id, &["chown", "1", "/tmp"]).await?;
    ensure!(chown.code != 0, "chown succeeded without CAP_CHOWN");
    Ok(())
}

/// A container run as uid 1000, gid 3000 with supplemental group 4000: an exec'd process has
/// the same ids, groups, (empty) effective capabilities and filter.
pub async fn exec_as_a_user_keeps_the_containers_identity_and_filter(c: &mut Case) -> Result<()> {
    let (pod, pod_config) = c.pod("user").await?;
    let mut config = sleeper(c, "user", profile(ProfileType::RuntimeDefault, ""));
    let sc = security(&mut config);
    sc.run_as_user = Some(Int64Value { value: 1000 });
    sc.run_as_group = Some(Int64Value { value: 3000 });
    sc.supplemental_groups = vec![4000];
    let id = c.run(&pod, &pod_config, config).await?;
    let conf = confinement(c, &id).await?;
    conf.same()?;
    let uid = conf.exec_value("Uid")?;
    ensure!(uid == "1000 1000 1000 1000", "Uid {uid}");
    let gid = conf.exec_value("Gid")?;
    ensure!(gid == "3000 3000 3000 3000", "Gid {gid}");
    let groups = conf.exec_value("Groups")?;
    ensure!(
        groups.split_whitespace().any(|g| g == "4000"),
        "Groups {groups}"
    );
    ensure!(conf.exec_value("Seccomp")? == "2", "{:?}", conf.exec);
    ensure!(conf.exec_caps("CapEff")? == 0, "{:?}", conf.exec);
    Ok(())
}

/// no_new_privs: set on the init and on every exec'd process, with the filter.
pub async fn exec_keeps_no_new_privs(c: &mut Case) -> Result<()> {
    let (pod, pod_config) = c.pod("nnp").await?;
    let mut config = sleeper(c, "nnp", profile(ProfileType::RuntimeDefault, ""));
    security(&mut config).no_new_privs = true;
    let id = c.run(&pod, &pod_config, config).await?;
    let conf = confinement(c, &id).await?;
    conf.same()?;
    ensure!(conf.exec_value("NoNewPrivs")? == "1", "{:?}", conf.exec);
    ensure!(conf.exec_value("Seccomp")? == "2", "{:?}", conf.exec);
    Ok(())
}

/// A Localhost profile that denies mkdir with EPERM: the init cannot mkdir, and neither can a
/// process exec'd later, while other calls work.
pub async fn a_localhost_seccomp_profile_confines_init_and_exec(c: &mut Case) -> Result<()> {
    let profile_path = write_file(
        &c.dir,
        "deny-mkdir.json",
        r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_X86_64"],
            "syscalls":[{"names":["mkdir","mkdirat"],"action":"SCMP_ACT_ERRNO","errnoRet":1}]}"#,
    )?;
    let (pod, pod_config) = c.pod("localhost").await?;
    let mut config = c.container_config(
        "deny-mkdir",
        &[
            "sh",
            "-c",
            "mkdir /tmp/by-init 2>/tmp/init.err; echo $? > /tmp/init.rc; exec sleep 3600",
        ],
    );
    own_pid_namespace(&mut config);
    security(&mut config).seccomp =
        profile(ProfileType::Localhost, &profile_path.display().to_string());
    let id = c.run(&pod, &pod_config, config).await?;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let init_rc = loop {
        let out = c.exec(&id, &["cat", "/tmp/init.rc"]).await?;
        if out.code == 0 || tokio::time::Instant::now() > deadline {
            break out.stdout;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    ensure!(
        init_rc.trim() == "1",
        "init's mkdir exit status {init_rc:?}"
    );
    let exec = c.exec(&id, &["mkdir", "/tmp/by-exec"]).await?;
    ensure!(
        exec.code != 0 && exec.stderr.contains("Operation not permitted"),
        "exec'd mkdir was not filtered: exit {}, stderr {:?}",
        exec.code,
        exec.stderr
    );
    c.exec_ok(&id, &["touch", "/tmp/allowed"]).await?;
    Ok(())
}

/// seccomp Unconfined: neither the init nor an exec'd process has a filter.
pub async fn an_unconfined_container_and_its_execs_have_no_filter(c: &mut Case) -> Result<()> {
    let (pod, pod_config) = c.pod("unconfined").await?;
    let config = sleeper(c, "unconfined", profile(ProfileType::Unconfined, ""));
    let id = c.run(&pod, &pod_config, config).await?;
    let conf = confinement(c, &id).await?;
    conf.same()?;
    ensure!(conf.exec_value("Seccomp")? == "0", "{:?}", conf.exec);
    Ok(())
}

/// A container run as a user name takes the uid and primary gid the image's `/etc/passwd`
/// gives it (containerd resolves the name; busybox's `nobody` is 65534:65534), and so does a
/// process exec'd into it.
pub async fn a_container_run_as_a_user_name_gets_the_images_ids_for_it(c: &mut Case) -> Result<()> {
    let (pod, pod_config) = c.pod("username").await?;
    let mut config = sleeper(c, "named", profile(ProfileType::RuntimeDefault, ""));
    security(&mut config).run_as_username = "nobody".into();
    let id = c.run(&pod, &pod_config, config).await?;
    let init = c.exec_ok(&id, &["cat", "/proc/1/status"]).await?;
    let exec = c.exec_ok(&id, &["cat", "/proc/self/status"]).await?;
    for (who, status) in [("init", &init), ("exec", &exec)] {
        let ids = status_fields(status, &["Uid", "Gid"]);
        ensure!(
            ids.iter()
                .all(|l| l.split_whitespace().skip(1).all(|n| n == "65534")),
            "{who} does not run as nobody: {ids:?}"
        );
    }
    Ok(())
}
