"""The keys each quadlet type accepts in its own section (Podman 5.x), and the required ones."""

from __future__ import annotations

_SHARED = {"ContainersConfModule", "GlobalArgs", "PodmanArgs"}


def _words(text: str) -> set[str]:
    return set(text.split())


KEYS: dict[str, frozenset[str]] = {
    "Container": frozenset(
        _SHARED
        | _words(
            """AddCapability AddDevice AddHost Annotation AutoUpdate CgroupsMode ContainerName
            DNS DNSOption DNSSearch DropCapability Entrypoint Environment EnvironmentFile
            EnvironmentHost Exec ExposeHostPort GIDMap Group GroupAdd HealthCmd HealthInterval
            HealthOnFailure HealthRetries HealthStartPeriod HealthStartupCmd
            HealthStartupInterval HealthStartupRetries HealthStartupSuccess
            HealthStartupTimeout HealthTimeout HostName Image IP IP6 Label LogDriver LogOpt Mask
            Mount Network NetworkAlias NoNewPrivileges Notify PidsLimit Pod PublishPort
            Pull ReadOnly ReadOnlyTmpfs Rootfs RunInit SeccompProfile Secret
            SecurityLabelDisable SecurityLabelFileType SecurityLabelLevel SecurityLabelNested
            SecurityLabelType ServiceName ShmSize StartWithPod StopSignal StopTimeout SubGIDMap
            SubUIDMap Sysctl Timezone Tmpfs UIDMap Ulimit Unmask User UserNS Volume
            WorkingDir"""
        )
    ),
    "Volume": frozenset(
        _SHARED | _words("Copy Device Driver Group Image Label Options Type User VolumeName")
    ),
    "Network": frozenset(
        _SHARED
        | _words(
            """DisableDNS DNS Driver Gateway InterfaceName Internal IPAMDriver IPRange IPv6
            Label NetworkDeleteOnStop NetworkName Options Subnet"""
        )
    ),
    "Pod": frozenset(
        _SHARED
        | _words(
            """AddHost DNS DNSOption DNSSearch GIDMap HostName IP IP6 Label Network
            NetworkAlias PodName PublishPort ServiceName ShmSize SubGIDMap SubUIDMap UIDMap
            UserNS Volume"""
        )
    ),
    "Kube": frozenset(
        _SHARED
        | _words(
            """AutoUpdate ConfigMap ExitCodePropagation KubeDownForce LogDriver Network
            PublishPort ServiceName SetWorkingDirectory UserNS Yaml"""
        )
    ),
    "Image": frozenset(
        _SHARED
        | _words(
            """AllTags Arch AuthFile CertDir Creds DecryptionKey Image ImageTag OS Pull
            TLSVerify Variant"""
        )
    ),
    "Build": frozenset(
        _SHARED
        | _words(
            """Annotation Arch AuthFile DNS DNSOption DNSSearch Environment File ForceRM GroupAdd
            ImageTag Label Network Pull Secret SetWorkingDirectory Target TLSVerify Variant
            Volume"""
        )
    ),
}

# (section, one-of keys): at least one key of each tuple must be present.
REQUIRED: dict[str, list[tuple[str, ...]]] = {
    "Container": [("Image", "Rootfs")],
    "Kube": [("Yaml",)],
    "Image": [("Image",)],
    "Build": [("ImageTag",), ("File", "SetWorkingDirectory")],
}

# Sections systemd itself owns; quadlet passes them through.
SYSTEMD_SECTIONS = frozenset({"Unit", "Install", "Service"})
