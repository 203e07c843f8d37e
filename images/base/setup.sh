#!/bin/sh
# Turn a plain Debian root file system into something that boots like a
# cloud VM in a container: systemd, sshd with per-machine host keys, a
# default user with passwordless sudo, and cloud-init as on Debian's cloud
# images. The local provider fills in authorized_keys itself and gives
# cloud-init no data source, so cloud-init stays off there; the EC2 emulator
# (scripts/ec2-emulator) writes a NoCloud seed (the instance's meta-data,
# key pair and user data) before the first boot, and cloud-init does the
# rest, as on EC2.
set -eu
: "${DEFAULT_USER:=admin}"

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    systemd systemd-sysv dbus openssh-server sudo python3 \
    ca-certificates iproute2 procps less curl cloud-init acl >/dev/null
apt-get clean
rm -rf /var/lib/apt/lists/*

# Units that have no meaning in a container.
systemctl mask \
    getty.target console-getty.service systemd-udevd.service \
    systemd-udev-trigger.service sys-kernel-config.mount \
    systemd-remount-fs.service systemd-firstboot.service >/dev/null 2>&1

# Host keys are made on each machine's first boot, never shared via the image.
rm -f /etc/ssh/ssh_host_*
cat >/etc/systemd/system/ssh-host-keys.service <<'UNIT'
[Unit]
Description=Generate SSH host keys on first boot
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
UNIT
systemctl enable ssh-host-keys.service ssh.service >/dev/null 2>&1
mkdir -p /etc/ssh/sshd_config.d
cat >/etc/ssh/sshd_config.d/50-cloud.conf <<'CONF'
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
UseDNS no
CONF

# The default user, like "admin" on Debian's cloud images.
useradd --create-home --shell /bin/bash --uid 1000 "$DEFAULT_USER"
install -d -m 0700 -o "$DEFAULT_USER" -g "$DEFAULT_USER" "/home/$DEFAULT_USER/.ssh"
echo "$DEFAULT_USER ALL=(ALL) NOPASSWD:ALL" >"/etc/sudoers.d/90-cloud-user"
chmod 0440 /etc/sudoers.d/90-cloud-user

# cloud-init reads only the NoCloud seed (/var/lib/cloud/seed/nocloud/):
# without one, its generator turns it off for the boot. Docker owns the
# network; the default user is Debian's cloud one; no locales are installed.
mkdir -p /etc/cloud/cloud.cfg.d
cat >/etc/cloud/cloud.cfg.d/90-dask-ec2-ansible.cfg <<CONF
# dask-ec2-ansible base image (images/base/setup.sh)
datasource_list: [NoCloud]
network:
  config: disabled
locale: false
ssh_genkeytypes: [rsa, ecdsa, ed25519]
system_info:
  default_user:
    name: $DEFAULT_USER
    lock_passwd: true
    gecos: Debian
    groups: [adm, sudo]
    sudo: ["ALL=(ALL) NOPASSWD:ALL"]
    shell: /bin/bash
CONF

# A machine id per container, made at boot.
: >/etc/machine-id
