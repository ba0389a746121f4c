//! One PNG per workload, drawn by gnuplot from the workload's CSV: a line per setup, the
//! workload's load on x (clients, offered rate) and its main figure on y. The suite writes the
//! gnuplot script beside the CSV (`<workload>.gp`) so a plot can be redrawn or restyled by
//! hand. gnuplot is optional (integration/setup.sh installs gnuplot-nox): without it the suite
//! says so and keeps the CSVs; a plot that fails is reported, never fatal.

use std::path::Path;
use std::process::Command;

use super::Setup;

/// What to draw from one CSV.
#[derive(Debug, Clone, Copy)]
pub(super) struct PlotSpec {
    /// The CSV's (and the PNG's) base name.
    pub name: &'static str,
    /// The title.
    pub title: &'static str,
    /// The x column (1-based; column 1 is the setup).
    pub x: u32,
    /// The x axis label.
    pub x_label: &'static str,
    /// The y column.
    pub y: u32,
    /// The y axis label.
    pub y_label: &'static str,
}

/// The plots, one per workload, by the CSV columns each workload writes.
pub(super) const SPECS: [PlotSpec; 5] = [
    PlotSpec {
        name: "web",
        title: "web: GET / (ab)",
        x: 2,
        x_label: "concurrent clients",
        y: 3,
        y_label: "requests/s",
    },
    PlotSpec {
        name: "download",
        title: "download: 1 MiB GET /blob (ab)",
        x: 2,
        x_label: "concurrent clients",
        y: 3,
        y_label: "MB/s",
    },
    PlotSpec {
        name: "upload",
        title: "upload: into the guest's echo service",
        x: 2,
        x_label: "concurrent clients",
        y: 3,
        y_label: "MB/s",
    },
    PlotSpec {
        name: "memory",
        title: "memory: checkpoint pause against dirtying rate",
        x: 2,
        x_label: "guest dirtying rate, MiB/s",
        y: 6,
        y_label: "pause p50, ms",
    },
    PlotSpec {
        name: "disk",
        title: "disk: 4 KiB O_DIRECT writes achieved",
        x: 2,
        x_label: "offered writes/s",
        y: 5,
        y_label: "achieved writes/s",
    },
];

/// The gnuplot script that draws `spec.name`.csv into `spec.name`.png (paths relative to the
/// run directory, where gnuplot runs).
pub(super) fn script(spec: &PlotSpec) -> String {
    let setups: Vec<&str> = Setup::ALL.iter().map(|s| s.name()).collect();
    format!(
        "set terminal png size 800,500 noenhanced\n\
         set output '{name}.png'\n\
         set datafile separator ','\n\
         set title '{title}'\n\
         set xlabel '{x_label}'\n\
         set ylabel '{y_label}'\n\
         set yrange [0:*]\n\
         set key top left\n\
         set grid\n\
         setups = '{setups}'\n\
         plot for [s in setups] '{name}.csv' skip 1 \
         using (strcol(1) eq s ? ${x} : NaN):(strcol(1) eq s ? ${y} : NaN) \
         with linespoints title s\n",
        name = spec.name,
        title = quoted(spec.title),
        x_label = quoted(spec.x_label),
        y_label = quoted(spec.y_label),
        setups = setups.join(" "),
        x = spec.x,
        y = spec.y,
    )
}

/// `text` inside gnuplot's single quotes, where a quote is written twice (the upload's title,
/// "the guest's echo service", once ended its string early and drew an empty PNG).
fn quoted(text: &str) -> String {
    text.replace('\'', "''")
}

/// Draws the PNG of every CSV present in `dir`; returns one line per problem (gnuplot missing,
/// a plot that failed) for the caller to print. Never fails the suite.
pub(super) fn draw_all(dir: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    let present: Vec<&PlotSpec> = SPECS
        .iter()
        .filter(|s| dir.join(format!("{}.csv", s.name)).exists())
        .collect();
    if present.is_empty() {
        return problems;
    }
    for spec in present {
        let gp = format!("{}.gp", spec.name);
        if let Err(e) = std::fs::write(dir.join(&gp), script(spec)) {
            problems.push(format!("writing {gp}: {e}"));
            continue;
        }
        match Command::new("gnuplot").arg(&gp).current_dir(dir).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => problems.push(format!(
                "gnuplot {gp} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                problems.push(
                    "no PNG plots: gnuplot is not installed (integration/setup.sh installs \
                     gnuplot-nox); the CSVs and the .gp scripts are written"
                        .into(),
                );
                break;
            }
            Err(e) => problems.push(format!("running gnuplot {gp}: {e}")),
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_draws_a_line_per_setup_from_the_csv() {
        let s = script(&SPECS[4]);
        assert!(s.contains("set output 'disk.png'"), "{s}");
        assert!(s.contains("setups = 'native twin stock colo'"), "{s}");
        assert!(
            s.contains(
                "'disk.csv' skip 1 using (strcol(1) eq s ? $2 : NaN):(strcol(1) eq s ? $5 : NaN)"
            ),
            "{s}"
        );
    }

    #[test]
    fn quotes_in_titles_are_doubled_for_gnuplot() {
        let upload = SPECS.iter().find(|s| s.title.contains('\'')).unwrap();
        let s = script(upload);
        let title = s.lines().find(|l| l.starts_with("set title")).unwrap();
        assert!(title.contains("guest''s"), "{title}");
    }

    /// With gnuplot installed, every workload's script draws a PNG from a CSV of its shape.
    #[test]
    fn every_plot_draws_when_gnuplot_is_installed() {
        if Command::new("gnuplot").arg("--version").output().is_err() {
            return;
        }
        let dir = std::env::temp_dir().join(format!("colo-plots-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for spec in SPECS {
            std::fs::write(
                dir.join(format!("{}.csv", spec.name)),
                "setup,a,b,c,d,e,f,g,h,i
native,1,2,3,4,5,6,7,8,9
colo,2,3,4,5,6,7,8,9,10
",
            )
            .unwrap();
        }
        let problems = draw_all(&dir);
        assert!(problems.is_empty(), "{problems:?}");
        for spec in SPECS {
            let png = std::fs::read(dir.join(format!("{}.png", spec.name))).unwrap();
            assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{}", spec.name);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// With gnuplot installed, a real CSV gives a real PNG (its signature checked).
    #[test]
    fn gnuplot_draws_a_png_when_installed() {
        let dir = std::env::temp_dir().join(format!("colo-plot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("disk.csv"),
            "setup,rate,seconds,writes,writes_per_s,mean_write_ms,twin_writes_per_s,checkpoints\n\
             native,16,10.0,160,16.00,2.00,,\nnative,64,10.0,640,64.00,2.00,,\n\
             colo,16,10.0,150,15.00,3.00,,2\ncolo,64,10.0,500,50.00,3.00,,4\n",
        )
        .unwrap();
        let problems = draw_all(&dir);
        let png = std::fs::read(dir.join("disk.png"));
        let gnuplot = Command::new("gnuplot").arg("--version").output().is_ok();
        if gnuplot {
            assert!(problems.is_empty(), "{problems:?}");
            assert_eq!(&png.unwrap()[..8], b"\x89PNG\r\n\x1a\n");
        } else {
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert!(problems[0].contains("gnuplot is not installed"));
        }
        assert!(dir.join("disk.gp").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
